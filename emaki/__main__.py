from emaki.cli import main

raise SystemExit(main())
