from dmgrd.cli import main

raise SystemExit(main())
