"""`python -m forgepipe` and `torchrun -m forgepipe ...`: the forgepipe command."""

from forgepipe.cli import main

if __name__ == "__main__":
    main()
