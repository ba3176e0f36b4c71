from glm_awq.cli import main

raise SystemExit(main())
