"""The base of the project's bad-input errors: their message is one line that names the value and what was expected,
and the command-line entry points print it as the whole story (diffmic.cli.one_line_errors). Packages built on the
core (tune/: storage, search) derive theirs from it too, so the core never needs to know them."""


class DiffmicError(Exception):
    pass
