import sys

from alignpipe.cli.main import main, pin_hash_seed

pin_hash_seed()
sys.exit(main())
