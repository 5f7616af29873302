import sys

from alignpipe.cli import main

sys.exit(main())
