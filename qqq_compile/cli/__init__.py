"""The ``qqq-compile`` command (:func:`qqq_compile.cli.main.main`)."""
