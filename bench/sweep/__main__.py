import sys

from bench.sweep import main

sys.exit(main())
