import sys

from tunemake.cli import main

sys.exit(main())
