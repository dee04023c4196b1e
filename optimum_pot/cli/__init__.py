"""The ``optimum-pot`` command line: ``quantize``, ``eval`` and ``info`` (see ``optimum-pot --help``)."""
