"""``python -m interplab.jobs ...`` runs the ``interplab`` CLI (the entrypoint of submitted jobs)."""

from interplab.cli.main import main

main()
