"""The command layer: the Hydra app and its commands, the only code that reads Hydra's config.

It turns the command line into typed settings once (settings.py: the engine's Options, the Recipe, the
output, the previews, the job's own switches) and hands them down: to the sweep package's pre-flight, records
and summary, and through it to the engine (api, plan, execute, package). Nothing below imports it.

    app.py        the entry point: subcommands, the command line to Hydra, Hydra's task
    arguments.py  the command line rewritten and checked before Hydra sees it
    options.py    the run options: names, defaults, meanings
    settings.py   Hydra's config read once into typed settings
    hydra_setup.py  what Hydra must know first: the recipe group, resolvers
    preflight.py  a single run's pre-flight (Hydra's callback) and a job's check from its config
    job.py        one job: plan printed, or merge, previews, keep_weights
    multirun.py   a sweep: its pre-flight before launch, each job recorded, the summary at the end
    commands.py   verify, summary, methods
    exits.py      how the command line ends on an error
"""
