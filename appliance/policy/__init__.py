"""The policy: rules as data, the engine that evaluates them, the built-in rules, profiles."""
