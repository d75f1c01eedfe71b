"""``python -m cyclereg_cli``: the ``cyclereg`` command where its console script is not on ``PATH``
(the same entry point, :func:`cyclereg_cli.entry.main`)."""

if __name__ == "__main__":  # not when a spawned worker process imports the parent's main module
    from cyclereg_cli.entry import main

    main()
