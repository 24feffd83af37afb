import sys

from engine.apps.resident.cli import resident_main

sys.exit(resident_main())
