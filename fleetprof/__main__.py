import sys

from fleetprof.cli import main

sys.exit(main())
