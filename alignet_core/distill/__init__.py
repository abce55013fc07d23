"""Stage 4, distill: a student finetuned with the AligNet loss, measured before and after."""
