"""`python -m lstm_surgeon` runs the command-line tool."""

from lstm_surgeon.cli import main

if __name__ == "__main__":
    main()
