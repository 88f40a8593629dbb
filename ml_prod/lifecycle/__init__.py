"""The retrain-evaluate-canary-promote loop: its rules (`policy`), which the control service applies to each application with a `lifecycle:` section."""
