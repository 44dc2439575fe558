import sys

from kilter.cli import main

sys.exit(main())
