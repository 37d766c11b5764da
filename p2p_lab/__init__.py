"""p2p_lab: what studies the app — evaluation, benchmarks, data converters and splits, LaMP import.

It imports `p2p_local`; `p2p_local` never imports it. Its heavier dependencies (scikit-learn,
rouge-score) are the `lab` extra, so the laptop app installs without them. Its commands (`p2p eval`,
`p2p bench`, `p2p data`) reach the `p2p` CLI through the `p2p_local.commands` entry-point group.
"""
