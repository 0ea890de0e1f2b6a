"""Drills: restore into a scratch environment, check, measure RTO/RPO, tear down, write evidence."""
