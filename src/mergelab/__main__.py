import sys

from mergelab.cli import main

sys.exit(main())
