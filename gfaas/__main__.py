import sys

from gfaas.cli import main

sys.exit(main())
