import sys

from sail_dist.cli import main

sys.exit(main())
