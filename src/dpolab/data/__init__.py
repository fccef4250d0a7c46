"""Preference data: sources -> shapes -> cleaning -> templates -> tokens -> prepared folder."""
