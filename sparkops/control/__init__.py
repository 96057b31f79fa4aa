"""What an operator does: audited actions and the playbook of diagnoses and fixes."""
