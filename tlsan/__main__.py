import sys

from tlsan.cli import main

sys.exit(main())
