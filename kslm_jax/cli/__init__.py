"""`kslm <command>`: argument parsing and one function per command. The only layer that wires the others together.
"""
