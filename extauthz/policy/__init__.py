"""What the policy says: the extauthz/v1 document parser (HTTP and connection rules),
conditions, path normalization, principals, and the compiled lookup tables. Pure:
extauthz.sources reads the files."""
