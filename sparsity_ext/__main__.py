from sparsity_ext_cli import main

if __name__ == "__main__":
    raise SystemExit(main())
