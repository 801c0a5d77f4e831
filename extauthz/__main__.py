from extauthz.cli.main import main

raise SystemExit(main())
