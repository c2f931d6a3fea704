from remesh.cli import main

raise SystemExit(main())
