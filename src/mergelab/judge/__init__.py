"""The organizer's judge: a competition home, submission intake, sandboxed judged runs, leaderboards.

Layout of a competition home (``mergelab judge init DIR``)::

    DIR/competition.yaml      the rules of the season (cut-off, size, licences, budget, split)
    DIR/inputs/T.csv          each hidden task WITHOUT its target column (what judged runs read)
    DIR/secret/targets/T.csv  the hidden tasks with targets (never visible to a judged run)
    DIR/secret/judge.sqlite   submissions, rounds, results, predictions, fingerprints
    DIR/store/<sha256>/       each submission, content-addressed (the sha256 of its files)
    DIR/hub-cache/            Hub snapshots fetched at intake (judged runs are offline)
    DIR/scratch/<sha256>/     one judged run's own folder

The modules: :mod:`.home` (configuration and layout), :mod:`.db` (SQLite), :mod:`.archive`
(safe extraction), :mod:`.intake` (``submit``), :mod:`.sandbox` (limits and isolation),
:mod:`.scoring`, :mod:`.fingerprint`, :mod:`.worker` (one judged run), :mod:`.rounds`,
:mod:`.leaderboard`, :mod:`.similar`, :mod:`.verify`; the service: :mod:`.teams` (team tokens, stored as
scrypt hashes), :mod:`.service` (``judge serve``: FastAPI over the same intake and database),
:mod:`.client` (``mergelab submit``).
"""
