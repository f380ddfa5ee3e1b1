import sys

from meshproxy.cli import main

sys.exit(main())
