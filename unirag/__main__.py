from unirag.cli import main

raise SystemExit(main())
