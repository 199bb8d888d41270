import sys

from wonderland.cli import main

sys.exit(main())
