"""Command-line tools of pycaffe_alt (``tools/<name>`` runs ``pycaffe_alt.tools.<name>.main``)."""
