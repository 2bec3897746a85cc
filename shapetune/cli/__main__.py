"""python -m shapetune.cli"""

from . import main

main()
