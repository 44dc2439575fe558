"""What every trainer shares: optimizer and schedule, seeding and training state, the sample table."""
