import sys

from alignpipe.cli.main import main

sys.exit(main())
