"""Who is calling: SPIFFE IDs, X.509-SVIDs, XFCC from trusted proxies, JWT-SVIDs, and the
resolver that picks one identity per check. Pure: key material and revocation lists are handed
in by extauthz.sources."""
