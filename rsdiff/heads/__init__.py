"""Per-pixel heads on frozen DDPM features: rsdiff's residual MLP (:mod:`.residual`) and the DDPM-Seg
ensemble (:mod:`.ensemble`); their config (:mod:`.config`), artifact (:mod:`.artifact`) and fitting
(:mod:`.fit`)."""
