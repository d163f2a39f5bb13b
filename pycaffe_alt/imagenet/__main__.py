"""``python3 -m pycaffe_alt.imagenet [PATH]``: write the ImageNet mean file."""
import sys

from . import main

sys.exit(main())
