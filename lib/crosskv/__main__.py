from crosskv.integrations.cli import main

raise SystemExit(main())
