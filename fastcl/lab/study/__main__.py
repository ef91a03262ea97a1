import sys

from fastcl.lab.study.cli import main

sys.exit(main())
