from edgevoice.cli import main

raise SystemExit(main())
