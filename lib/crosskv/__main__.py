from crosskv.cli import main

raise SystemExit(main())
