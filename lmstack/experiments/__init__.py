"""Named experiments: recipes (one TOML file each, beside this one) over the existing stages and
evaluations, run per variant x scale x seed and recorded in a results store (`lmstack experiment`)."""
