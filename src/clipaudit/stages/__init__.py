"""Pipeline stages: plain functions over batches and tables; Ray scheduling lives in clipaudit.runtime."""
