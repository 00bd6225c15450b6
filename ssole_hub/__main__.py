import sys

from ssole_hub.cli import main

sys.exit(main())
