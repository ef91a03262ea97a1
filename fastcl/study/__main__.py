import sys

from fastcl.study.cli import main

sys.exit(main())
