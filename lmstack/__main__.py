# `python -m lmstack ...` and `torchrun -m lmstack ...` land here.
from lmstack.cli import main

raise SystemExit(main())
