from fastsend.cli import main

raise SystemExit(main())
